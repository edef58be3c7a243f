"""The names of the Prefect events headstart emits, in one place: automations and deployment
triggers (prefect.yaml) match on them."""

# New images in a data folder (from the `watch` deployment or `headstart data changed`); its
# resource is `headstart.data.<absolute path>`, which the `retrain` deployment's trigger matches.
DATA_CHANGED = "headstart.data.changed"
DATA_RESOURCE_PREFIX = "headstart.data."

# A training run's gate made its model the champion, or kept the champion (or no model) in its
# place; the resource is the run's model, `headstart.model.<version>` (tasks/outcome.py).
MODEL_PROMOTED = "headstart.model.promoted"
MODEL_KEPT = "headstart.model.kept"
MODEL_RESOURCE_PREFIX = "headstart.model."

# The champion as the dashboard shows it: a variable (JSON: version, accuracy, run directory, …)
# and a markdown artifact with its report, both replaced at every promotion and rollback.
CHAMPION_VARIABLE = "headstart_champion"
CHAMPION_ARTIFACT = "headstart-champion"
