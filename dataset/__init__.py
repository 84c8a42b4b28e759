"""The refined dataset (layout, manifest, tables) and the storage it lives on (local or s3://)."""

from dataset.refined import DatasetError, Manifest, RefinedDataset  # noqa: F401
