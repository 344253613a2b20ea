"""REST API of the runs app (Django REST framework), mounted under /api/."""
