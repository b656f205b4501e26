"""Gallery and embedding tables: schemas, Parquet I/O on local disk or S3, images, datasets."""
