"""DeepSeek-V4 model parts (the package's contents are listed by the modules; see docs/V4.md)."""
