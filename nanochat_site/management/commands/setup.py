"""`manage.py setup`: migrate and make sure an admin exists (one-shot, idempotent).

`up` runs the same steps; multi-machine deployments run this once per release (the compose
file's `setup` service) before starting web and workers.
"""

from django.core.management import call_command
from django.core.management.base import BaseCommand

from nanochat_site.bootstrap import ensure_superuser, password_file


class Command(BaseCommand):
    help = "Apply migrations and create the first admin account if there is none."

    def handle(self, *args, **options):
        call_command("migrate", interactive=False, verbosity=0)
        username, password = ensure_superuser()
        if password:
            self.stdout.write(
                f"created admin account: {username} / {password}  (also in {password_file()})"
            )
        else:
            self.stdout.write(f"database ready; admin account: {username}")
