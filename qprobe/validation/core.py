"""A small runner for data checks: Great Expectations expectations plus plain Python checks.

Every dataset the pipeline writes is validated before a stage declares it good. A
:class:`Suite` holds Great Expectations 1.x expectations (run on a pandas DataFrame in an
ephemeral context: nothing is written to disk, no GX project folder) and Python checks for what
expectations cannot say (nested columns, files on disk, relations between rows). Each check is a
function ``frame -> iterable of failure lines``. :func:`validate` runs a suite and returns the
failures as readable lines; :func:`require` runs one or more suites and raises
:class:`ValidationError` listing every failure, which the CLI prints as one line (exit code 2).

Usage::

    suite = Suite("manifest", expectations=[gxe.ExpectColumnValuesToBeUnique(column="id")],
                  checks=[files_exist])
    require((suite, df), name="data/bench/manifest.parquet")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from qprobe.errors import QProbeError

log = logging.getLogger(__name__)
# Set before GX is first imported: no usage analytics (these machines are offline), and none of the
# hundreds of INFO lines GX logs about its own API registry while importing.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
logging.getLogger("great_expectations").setLevel(logging.WARNING)

Check = Callable[[pd.DataFrame], Iterable[str]]
MAX_EXAMPLES = 3  # offending values quoted per failed expectation
MAX_IN_MESSAGE = 8  # failures spelled out in the exception's one-line message; the log has all


class ValidationError(QProbeError, ValueError):
    """A dataset that failed its suite; ``failures`` lists every failed check, one line each."""

    def __init__(self, name: str, failures: Sequence[str]) -> None:
        self.name = name
        self.failures = list(failures)
        shown = "; ".join(self.failures[:MAX_IN_MESSAGE])
        more = len(self.failures) - MAX_IN_MESSAGE
        tail = f"; and {more} more (see the log)" if more > 0 else ""
        super().__init__(f"{name} failed validation ({len(self.failures)} failed checks): {shown}{tail}")


@dataclass
class Suite:
    """A named list of Great Expectations expectations and Python checks for one DataFrame."""

    name: str
    expectations: list[Any] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _describe(result: Any) -> str:
    config = result.expectation_config
    kwargs = ", ".join(f"{k}={v}" for k, v in config.kwargs.items() if k != "batch_id")
    what = f"{config.type}({kwargs})"
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"{what}: could not run ({result.exception_info.get('exception_message')})"
    info = result.result or {}
    if "unexpected_count" in info:
        examples = [v.item() if hasattr(v, "item") else v for v in info.get("partial_unexpected_list", [])]
        examples = examples[:MAX_EXAMPLES]
        return f"{what}: {info['unexpected_count']} rows fail, e.g. {examples}"
    if "observed_value" in info:
        return f"{what}: observed {info['observed_value']}"
    return f"{what}: failed"


def run_expectations(df: pd.DataFrame, expectations: Sequence[Any], name: str = "data") -> list[str]:
    """Run Great Expectations ``expectations`` on ``df``; one line per failed expectation."""
    if not expectations:
        return []
    import great_expectations as gx

    context = _context()
    batch_definition = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=[e.copy() for e in expectations]))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=suite)
    )
    results = definition.run(batch_parameters={"dataframe": df})
    return [_describe(r) for r in results.results if not r.success]


def validate(df: pd.DataFrame, suite: Suite) -> list[str]:
    """All failures of ``suite`` on ``df``: expectations first, then the Python checks, in order."""
    failures = [f"{suite.name}: {line}" for line in run_expectations(df, suite.expectations, suite.name)]
    for check in suite.checks:
        failures.extend(f"{suite.name}: {line}" for line in check(df))
    return failures


def require(*suites: tuple[Suite, pd.DataFrame], name: str) -> None:
    """Validate each ``(suite, frame)``; raise :class:`ValidationError` naming ``name`` if anything failed."""
    failures = [line for suite, df in suites for line in validate(df, suite)]
    if failures:
        for line in failures:
            log.error("validation: %s: %s", name, line)
        raise ValidationError(name, failures)
    log.info("validation: %s passed %d suite(s)", name, len(suites))
