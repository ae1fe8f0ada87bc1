"""Models: the factory that loads any Qwen2.5-VL checkpoint folder, and the tiny offline one."""
