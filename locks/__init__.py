"""Lock files: the exact, hashed versions of every place the stack is installed (see locks/targets.py)."""
