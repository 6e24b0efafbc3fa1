"""What the benchmark scripts share (each puts the repository on
``sys.path`` first, as it must to import this)."""

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_data_dir(ap: argparse.ArgumentParser) -> None:
  """``--data_dir``: the MNIST / Fashion-MNIST IDX files, by default
  ``$JAXCL_DATA_DIR`` or the ``shared/data`` folder beside the repository
  (where CI and these machines keep them)."""
  ap.add_argument("--data_dir", default=os.environ.get(
      "JAXCL_DATA_DIR", os.path.join(REPO, "..", "shared", "data")))
