"""Nimbus worker: model runtime on a paged KV cache, sampler and step executor (owns the tensors)."""
