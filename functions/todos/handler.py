"""A small JSON API on declared routes, its data in the tenant's KV store.

    GET    /todos          list
    POST   /todos          {"title": "..."} -> 201
    GET    /todos/{id}     one item
    DELETE /todos/{id}     remove
"""

import json

from nsfaas import Response


def handler(request, ctx):
    todo_id = request.path_params.get("id")
    if request.method == "GET" and todo_id is None:
        keys = ctx.kv.list("todo:", limit=100)
        return [ctx.kv.get(k) for k in keys]
    if request.method == "POST":
        try:
            title = str(request.json()["title"])
        except (ValueError, KeyError, TypeError):
            return Response({"error": "send {\"title\": \"...\"}"}, status=400)
        new_id = ctx.kv.incr("todo-seq")
        item = {"id": new_id, "title": title}
        ctx.kv.put(f"todo:{new_id:08d}", item)
        return Response(json.dumps(item), status=201, headers={"content-type": "application/json"})
    key = f"todo:{int(todo_id):08d}" if todo_id and todo_id.isdigit() else None
    item = ctx.kv.get(key) if key else None
    if item is None:
        return {"error": "not found"}, 404
    if request.method == "DELETE":
        ctx.kv.delete(key)
        return "", 204
    return item
