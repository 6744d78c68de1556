"""Where records go: result files (JSONL/CSV) and the terminal."""
