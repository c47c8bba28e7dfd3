"""UltraFlux ground floor, shared by every other package of the monorepo and importing none of them.

``errors`` (the one exception type), ``config`` (sections, the layered YAML loader, overrides), ``options`` (CLI
options generated from config fields), ``console`` (one-line errors), ``files`` (sha256, link-or-copy) and
``tracking`` (MLflow: URIs, runs, lineage, registry).
"""
