from shared.service import serve
from services.referral.app import create_app

serve("referral", create_app)
