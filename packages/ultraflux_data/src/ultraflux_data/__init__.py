"""UltraFlux data curation: MultiAspect-4K metadata, safe download, ingest, scores, filters, buckets, shards, latent
caches (on one process or Ray), and the VAE post-training job. Imports the model and metrics packages, never the
reverse."""
