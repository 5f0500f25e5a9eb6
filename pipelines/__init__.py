"""Ray Data pipelines around the gen1 model library: preprocess, edit, evaluate."""

from pipelines.storage import configure_s3_retries

configure_s3_retries()  # every process running pipeline code (driver, Ray workers): S3 retries with backoff
