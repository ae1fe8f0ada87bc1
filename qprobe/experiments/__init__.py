"""The paper's experiments: a registry of variants (:mod:`.registry`), the runner that makes each a DVC
experiment and an MLflow run (:mod:`.runner`), and the paper-shaped table (:mod:`.report`)."""
