"""How the graph runs itself: one job per stage, the sensors that register partitions (config, new SAE
releases) and the automation sensor that materializes what is missing or stale."""
