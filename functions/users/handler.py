"""Path parameters: GET /users/{id} (declared route) -> a made-up profile."""

import hashlib


def handler(request, ctx):
    user_id = request.path_params.get("id", "anonymous")
    color = hashlib.sha256(user_id.encode()).hexdigest()[:6]
    return {"id": user_id, "name": f"user-{user_id}", "color": f"#{color}"}
