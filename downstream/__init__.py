"""The four reference downstream services (product, user, inventory, shipping) + faults.

Someone else's service: imports nothing from `fsm` or `api`. Entry point:
`downstream.app.create_services_app(state_path=None)`.
"""
