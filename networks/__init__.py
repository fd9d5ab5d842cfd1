"""Plain nn.Module networks, each defined once by its forward; the LightningModules train them."""
