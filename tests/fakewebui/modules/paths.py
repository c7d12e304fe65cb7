models_path = "models"
