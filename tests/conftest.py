"""Shared test fixtures: the offline data directory and small scenarios."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("JAXCL_DATA_DIR",
                          os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_dir():
  if not os.path.isdir(os.path.join(DATA_DIR, "mnist")):
    raise FileNotFoundError(
        f"offline MNIST files not found in {DATA_DIR!r}; set JAXCL_DATA_DIR "
        "to the directory holding mnist/ and fashion_mnist/")
  return DATA_DIR


@pytest.fixture(scope="session")
def mnist(data_dir):
  from jaxcl import datasets
  return datasets.load("mnist", data_dir=data_dir)


@pytest.fixture(scope="session")
def digits():
  from jaxcl import datasets
  return datasets.load("digits")
