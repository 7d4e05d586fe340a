"""Control plane: pure Python, no torch. Works on token counts and block ids."""
