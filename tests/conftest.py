import sys
from pathlib import Path

# tests/ holds shared helpers (the reference GPT, name tables) imported by the suites below it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
