"""HTTP handlers, one module per area; app/routes.py maps the routes to them."""
