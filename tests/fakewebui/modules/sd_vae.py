vae_dict = {}
