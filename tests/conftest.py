import os
import sys

# numpy_reference.py sits beside the tests; the package itself is imported
# from wherever it is installed (never from src/).
sys.path.insert(0, os.path.dirname(__file__))
