"""The names of the Prefect events headstart emits, in one place: automations and deployment
triggers (prefect.yaml) match on them."""

# New images in a data folder (from the `watch` deployment or `headstart data changed`); its
# resource is `headstart.data.<absolute path>`, which the `retrain` deployment's trigger matches.
DATA_CHANGED = "headstart.data.changed"
DATA_RESOURCE_PREFIX = "headstart.data."
