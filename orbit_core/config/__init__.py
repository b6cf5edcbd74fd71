from orbit_core.config.loader import (
    apply_overrides,
    build_config,
    list_recipes,
    load_recipe,
    recipe_path,
    to_dict,
    to_yaml,
    validate,
)
from orbit_core.config.schema import (
    DataSection,
    EvalSection,
    ModelSection,
    PeftSection,
    RecipeConfig,
    RLSection,
    RolloutSection,
    TrainSection,
)

__all__ = [
    "apply_overrides", "build_config", "list_recipes", "load_recipe", "recipe_path", "to_dict",
    "to_yaml", "validate", "DataSection", "EvalSection", "ModelSection", "PeftSection",
    "RecipeConfig", "RLSection", "RolloutSection", "TrainSection",
]
