"""UltraFlux Studio: the web app (``ultraflux ui``)."""
