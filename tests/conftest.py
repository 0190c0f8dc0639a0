"""Put tests/ on sys.path so test files can `from layouts import write_voc` in any import mode."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
