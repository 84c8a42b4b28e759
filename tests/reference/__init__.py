"""Reference implementations that tests compare against (not part of the project)."""
