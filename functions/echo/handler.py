"""Echo the request back: method, path, query, headers and body."""


def handler(request, ctx):
    print(f"echo {request.method} {request.path}")
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query_all,
        "headers": dict(request.headers),
        "body": request.text(),
        "invocation_id": ctx.invocation_id,
    }
