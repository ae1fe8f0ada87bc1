"""The agent: protocol, crop tool, rollout loop and generation backends (DESIGN.md, Protocol)."""
