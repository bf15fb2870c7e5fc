"""A child process's one lifecycle, from both sides: started pinned, watched, described when it ends (parent); bootstrapped before the framework loads (child)."""
