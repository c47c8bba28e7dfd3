"""UltraFlux, the top floor: the root config tree (``params.yaml``'s schema, assembled from the sections each
package owns) and the ``ultraflux`` command line composed of every package's commands."""
