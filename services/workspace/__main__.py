from shared.service import serve
from services.workspace.app import create_app

serve("workspace", create_app)
