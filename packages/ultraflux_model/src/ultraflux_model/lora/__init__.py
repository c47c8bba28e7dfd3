"""LoRA adapters on the UltraFlux transformer: target presets (``targets``), the adapter folder (``adapters``),
applying adapters at generation (``apply``) and exporting them for other tools (``export``).

An adapter on disk is a folder holding diffusers' ``pytorch_lora_weights.safetensors`` (keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, what ``FluxPipeline.save_lora_weights`` writes) and
``ultraflux_lora.json`` (base, base fingerprint, rank, alpha, targets, method); docs/lora.md.
"""
