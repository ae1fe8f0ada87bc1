"""The agent: protocol, crop tool, rollout loop and generation backends (docs/architecture.md, The protocol)."""
