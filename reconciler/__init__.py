"""batchplan: a declarative, Terraform-style reconciler for the OpenAI Batch API."""

__version__ = "0.1.0"
