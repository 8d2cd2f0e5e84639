from shared.service import serve
from services.analytics.app import create_app

serve("analytics", create_app)
