"""The training application: `python -m train --config=configs/X.py --workdir=DIR`."""
