"""The sandbox's Graph mail actions: reply/replyAll/forward and createReply*, move, PATCH flag,
$search with its restrictions, $filter/$orderby, conversation filtering — each with Graph's error shapes."""

from __future__ import annotations

import hashlib
from urllib.parse import unquote

from devstack.sandbox.mailbox import synthetic_chunks
from tests.devstack.test_sandbox_graph import ADELE, bearer, graph_error

LEAD = {"emailAddress": {"address": "lead@example.com", "name": "Lead"}}


def _seed(ctl, **fields):
    [mid] = ctl.seed_messages(ADELE, [{"subject": "Question", "from": LEAD, **fields}])
    return mid


def test_reply_is_202_and_keeps_the_conversation(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    base = f"{sandbox_server.url}/v1.0/me/messages"
    mid = _seed(ctl, conversationId="AAQkAGconv1", internetMessageId="<q1@example.com>")
    r = http.post(f"{base}/{mid}/reply", json={"comment": "Answer"}, headers=bearer(at), timeout=10)
    assert r.status_code == 202 and r.content == b""
    [sent] = ctl.sent(ADELE)
    assert sent["via"] == "reply" and sent["inReplyTo"] == "<q1@example.com>"
    assert sent["message"]["conversationId"] == "AAQkAGconv1" and sent["message"]["subject"] == "RE: Question"
    graph_error(http.post(f"{base}/{mid}/reply", json={"comment": "a", "message": {"body": {
        "contentType": "text", "content": "b"}}}, headers=bearer(at), timeout=10), 400, "ErrorInvalidRequest")
    graph_error(http.post(f"{base}/{mid}/reply", json={"toRecipients": []}, headers=bearer(at), timeout=10),
                400, "RequestBodyRead")
    graph_error(http.post(f"{base}/{mid}/forward", json={"comment": "x"}, headers=bearer(at), timeout=10),
                400, "ErrorInvalidRecipients")
    graph_error(http.post(f"{base}/{'A' * 40}/reply", json={"comment": "x"}, headers=bearer(at), timeout=10),
                404, "ErrorItemNotFound")
    assert len(ctl.sent(ADELE)) == 1


def test_create_reply_all_is_a_draft_in_the_thread(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    base = f"{sandbox_server.url}/v1.0/me/messages"
    mid = _seed(ctl, conversationId="AAQkAGconv2", toRecipients=[{"emailAddress": {"address": ADELE}},
                                                                {"emailAddress": {"address": "b@example.com"}}])
    r = http.post(f"{base}/{mid}/createReplyAll", headers=bearer(at), timeout=10)
    assert r.status_code == 201, r.text
    draft = r.json()
    assert draft["isDraft"] is True and draft["conversationId"] == "AAQkAGconv2"
    assert [x["emailAddress"]["address"] for x in draft["toRecipients"]] == ["lead@example.com", "b@example.com"]
    assert http.post(f"{base}/{draft['id']}/send", headers=bearer(at), timeout=10).status_code == 202
    [sent] = ctl.sent(ADELE)
    assert sent["via"] == "draft" and sent["message"]["conversationId"] == "AAQkAGconv2" and sent["inReplyTo"]


def test_move_gives_a_new_id(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    base = f"{sandbox_server.url}/v1.0/me/messages"
    mid = _seed(ctl)
    r = http.post(f"{base}/{mid}/move", json={"destinationId": "archive"}, headers=bearer(at), timeout=10)
    assert r.status_code == 201 and r.json()["id"] != mid
    graph_error(http.get(f"{base}/{mid}", headers=bearer(at), timeout=10), 404, "ErrorItemNotFound")
    new = r.json()["id"]
    graph_error(http.post(f"{base}/{new}/move", json={"destinationId": "nope"}, headers=bearer(at), timeout=10),
                400, "ErrorInvalidIdMalformed")
    graph_error(http.post(f"{base}/{new}/move", json={"destinationId": "AAMkAG" + "z" * 30}, headers=bearer(at),
                          timeout=10), 404, "ErrorItemNotFound")
    graph_error(http.post(f"{base}/{new}/move", json={"folder": "inbox"}, headers=bearer(at), timeout=10),
                400, "RequestBodyRead")


def test_patch_flag_is_typed(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    mid = _seed(ctl)
    url = f"{sandbox_server.url}/v1.0/me/messages/{mid}"
    r = http.patch(url, json={"flag": {"flagStatus": "flagged"}, "categories": ["Red"]}, headers=bearer(at),
                   timeout=10)
    assert r.status_code == 200 and r.json()["flag"] == {"flagStatus": "flagged"} and r.json()["categories"] == ["Red"]
    graph_error(http.patch(url, json={"flag": {"flagStatus": "red"}}, headers=bearer(at), timeout=10),
                400, "RequestBodyRead")
    graph_error(http.patch(url, json={"flag": "flagged"}, headers=bearer(at), timeout=10), 400, "RequestBodyRead")


def test_search_rules_and_skiptoken_paging(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    url = f"{sandbox_server.url}/v1.0/me/messages"
    ctl.seed_messages(ADELE, [{"subject": f"walrus {i}", "from": LEAD} for i in range(7)])
    graph_error(http.get(url, params={"$search": '"walrus"', "$orderby": "receivedDateTime desc"},
                         headers=bearer(at), timeout=10), 400, "SearchWithOrderBy")
    graph_error(http.get(url, params={"$search": '"walrus"', "$filter": "isRead eq false"}, headers=bearer(at),
                         timeout=10), 400, "SearchWithFilter")
    first = http.get(url, params={"$search": '"from:lead@example.com AND walrus"', "$top": "5"}, headers=bearer(at),
                     timeout=10).json()
    assert len(first["value"]) == 5 and "$skiptoken=" in unquote(first["@odata.nextLink"])
    rest = http.get(first["@odata.nextLink"], headers=bearer(at), timeout=10).json()
    assert len(rest["value"]) == 2 and "@odata.nextLink" not in rest
    sent = [m["sentDateTime"] for m in first["value"] + rest["value"]]
    assert sent == sorted(sent, reverse=True)


def test_filter_with_orderby_and_conversations(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    url = f"{sandbox_server.url}/v1.0/me/messages"
    ctl.seed_messages(ADELE, [{"subject": f"t{i}", "conversationId": "AAQkAGthread",
                               "receivedDateTime": f"2024-02-0{i + 1}T00:00:00Z"} for i in range(3)])
    # https://learn.microsoft.com/graph/api/user-list-messages: the $orderby property must lead the $filter
    graph_error(http.get(url, params={"$filter": "conversationId eq 'AAQkAGthread'", "$orderby": "receivedDateTime"},
                         headers=bearer(at), timeout=10), 400, "InefficientFilter")
    r = http.get(url, params={"$filter": "receivedDateTime ge 1900-01-01T00:00:00Z and conversationId eq "
                              "'AAQkAGthread'", "$orderby": "receivedDateTime asc"}, headers=bearer(at), timeout=10)
    assert [m["subject"] for m in r.json()["value"]] == ["t0", "t1", "t2"]


def test_synthetic_large_attachment_is_streamed(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    size = 20 * 1024 * 1024 + 7
    [mid] = ctl.seed_messages(ADELE, [{"subject": "big", "attachments": [
        {"name": "big.bin", "contentType": "application/octet-stream", "size": size, "seed": "s1"}]}])
    base = f"{sandbox_server.url}/v1.0/me/messages/{mid}/attachments"
    [att] = http.get(base, headers=bearer(at), timeout=10).json()["value"]
    assert att["size"] == size and "contentBytes" not in att
    r = http.get(f"{base}/{att['id']}/$value", headers=bearer(at), timeout=30, stream=True)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
    got, want = hashlib.sha256(), hashlib.sha256()
    for piece in r.iter_content(1 << 20):
        got.update(piece)
    for piece in synthetic_chunks("s1", size):
        want.update(piece)
    assert got.hexdigest() == want.hexdigest()


def test_body_preview_is_plain_text_as_graphs_is():
    from devstack.sandbox.mailbox import body_preview

    html = ("<html><head><title>t</title><style>p{color:red}</style></head><body><p>Hello&nbsp;<b>Adele</b>,</p>"
            "<script>alert(1)</script>\n\n<p>see   the &lt;report&gt;.</p></body></html>")
    assert body_preview({"contentType": "html", "content": html}) == "Hello Adele, see the <report>."
    assert body_preview({"contentType": "text", "content": "a\n\n b " + "x" * 300}).startswith("a b x")
    assert len(body_preview({"contentType": "HTML", "content": "<p>" + "y" * 400 + "</p>"})) == 255


IMMUTABLE = {"Prefer": 'IdType="ImmutableId"'}


def test_with_immutable_ids_a_message_keeps_its_id_through_moves_and_a_sent_draft(sandbox_server, ctl, http, flows):
    """https://learn.microsoft.com/graph/outlook-immutable-id: with `Prefer: IdType="ImmutableId"` every answer
    names the message by an id that stays when it moves (to another folder, or a draft to Sent Items)."""
    at = flows.sign_in(ADELE)["access_token"]
    base = f"{sandbox_server.url}/v1.0/me/messages"
    [mid] = ctl.seed_messages(ADELE, [{"subject": "Keep me"}], immutable=True)
    both = {**bearer(at), **IMMUTABLE}
    assert http.get(f"{base}/{mid}", headers=both, timeout=10).json()["id"] == mid
    regular = http.get(f"{base}/{mid}", headers=bearer(at), timeout=10).json()["id"]  # either id works in a URL
    assert regular != mid
    moved = http.post(f"{base}/{mid}/move", json={"destinationId": "archive"}, headers=both, timeout=10)
    assert moved.status_code == 201 and moved.json()["id"] == mid and moved.json()["parentFolderId"] != ""
    assert http.get(f"{base}/{mid}", headers=both, timeout=10).json()["subject"] == "Keep me"
    graph_error(http.get(f"{base}/{regular}", headers=bearer(at), timeout=10), 404, "ErrorItemNotFound")
    listed = http.get(f"{sandbox_server.url}/v1.0/me/mailFolders/archive/messages", headers=both, timeout=10).json()
    assert mid in [m["id"] for m in listed["value"]]
    # A draft sent with the header: its id names the Sent Items copy afterwards.
    draft = http.post(f"{base}/{mid}/createReply", headers=both, timeout=10).json()
    assert http.post(f"{base}/{draft['id']}/send", headers=both, timeout=10).status_code == 202
    sent = http.get(f"{base}/{draft['id']}", headers=both, timeout=10).json()
    assert sent["id"] == draft["id"] and sent["isDraft"] is False


def test_delta_names_messages_by_the_id_type_asked_for(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    url = f"{sandbox_server.url}/v1.0/me/mailFolders/inbox/messages/delta"
    both = {**bearer(at), **IMMUTABLE}
    [mid] = ctl.seed_messages(ADELE, [{"subject": "Delta"}], immutable=True)
    first = http.get(url, headers=both, timeout=10).json()
    while "@odata.nextLink" in first:
        page = http.get(first["@odata.nextLink"], headers=both, timeout=10).json()
        first = {**page, "value": first["value"] + page["value"]}
    assert mid in [m["id"] for m in first["value"]]
    http.post(f"{sandbox_server.url}/v1.0/me/messages/{mid}/move", json={"destinationId": "archive"}, headers=both,
              timeout=10)
    second = http.get(first["@odata.deltaLink"], headers=both, timeout=10).json()
    assert second["value"] == [{"@odata.type": "#microsoft.graph.message", "id": mid, "@removed": {"reason": "deleted"}}]
