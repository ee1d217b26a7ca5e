"""gunicorn's target: `gunicorn -c scripts/gunicorn.conf.py wsgi:app`."""

from app import create_app

app = create_app()
