-- Webhooks: an event of a key that has a webhook (`hook`: the key's name), queued for
-- delivery in the same step as what it reports (worker/webhooks.py delivers it).
-- needs: clock

-- Queue event `kind` (job.succeeded, batch.completed...) about `data_id`. Its id is the
-- same for the same event of the same job or batch, so reporting it twice queues it once;
-- its body is fixed now, so every attempt sends the same bytes under the same webhook-id.
local function emit_webhook(hook, kind, data_id, now)
  if not hook or hook == '' then return end
  local id = 'evt_' .. string.sub(redis.sha1hex(kind .. ' ' .. data_id), 1, 24)
  local wk = K_WEBHOOK .. id
  if redis.call('EXISTS', wk) == 1 then return end
  local created_s = math.floor(now / 1000)
  local body = cjson.encode({id = id, object = 'event', type = kind, created_at = created_s,
    data = {id = data_id}})
  redis.call('HSET', wk, 'id', id, 'key', hook, 'type', kind, 'data_id', data_id,
    'created_at', now, 'body', body, 'attempts', 0, 'state', 'pending', 'next_at', now)
  redis.call('ZADD', K_WEBHOOK_DUE, now, id)
  redis.call('ZADD', K_WEBHOOKS_OF .. hook, now, id)
end
