from shared.service import serve
from services.notifications.app import create_app

serve("notifications", create_app)
