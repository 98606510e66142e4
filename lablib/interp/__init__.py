"""Looking inside models: any experiment or widget may use these (analysis: caches, attention, logit lens,
probes, patching; tracing: causal tracing and single-layer edits; pathways: a mixture of experts' routes)."""
