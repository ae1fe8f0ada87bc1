"""S3 calls are bounded: an endpoint that accepts connections and never answers fails, naming itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_silent import SilentEndpoint

from qprobe import cli, storage


@pytest.fixture
def silent_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentEndpoint]:
    endpoint = SilentEndpoint()
    env = {"AWS_ENDPOINT_URL": endpoint.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "QPROBE_S3_CONNECT_TIMEOUT": "0.5", "QPROBE_S3_READ_TIMEOUT": "0.5", "QPROBE_S3_MAX_ATTEMPTS": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage.client.cache_clear()
    yield endpoint
    storage.client.cache_clear()
    endpoint.close()


def test_a_silent_endpoint_fails_after_the_configured_tries_naming_it(silent_s3):
    with pytest.raises(storage.StorageError) as info:
        list(storage.list_objects("s3://photos/raw"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"s3://photos/raw: no answer from the S3 endpoint {silent_s3.url} (ReadTimeoutError")
    assert "2 tries of 0.5 s to connect, 0.5 s to read" in message
    assert len(silent_s3.accepted) == 2  # the retries are bounded: one connection per try, no more


def test_bench_on_a_silent_endpoint_is_a_one_line_error(silent_s3, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--source", "s3://photos/raw", "--out", str(out), "--metrics", str(tmp_path / "m.json")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"qprobe bench: error: s3://photos/raw: no answer from the S3 endpoint {silent_s3.url} ")
    assert not out.exists()


def test_default_limits_give_up_within_a_minute(monkeypatch):
    for var in ("QPROBE_S3_CONNECT_TIMEOUT", "QPROBE_S3_READ_TIMEOUT", "QPROBE_S3_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    bounds = storage.limits()
    assert bounds == storage.Limits()
    assert bounds.worst_case_s() < 60  # benchmarks/s3_silent_endpoint.py measures the real figure


@pytest.mark.parametrize(("var", "value"), [("QPROBE_S3_READ_TIMEOUT", "soon"), ("QPROBE_S3_MAX_ATTEMPTS", "0"),
                                            ("QPROBE_S3_MAX_ATTEMPTS", "1.5")])
def test_bad_limit_settings_name_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(storage.StorageError, match=rf"^{var}='{value}': expected a positive "):
        storage.limits()
