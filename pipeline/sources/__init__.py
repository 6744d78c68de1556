"""Where jobs come from: a directory walk (more sources in later versions)."""
