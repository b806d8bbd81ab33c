-- Appends chat messages to the shared log, atomically: one cluster-wide,
-- gapless sequence of ids, each message stored once however often it is sent.
--
-- KEYS[1]  the meta hash: `epoch` (the log's name) and `seq` (the last id)
-- KEYS[2]  the log stream; entry id `<id>-0`, so the stream id IS the message id
-- ARGV[1]  an epoch to use if the log has none yet (new, or its data was lost)
-- ARGV[2]  the stream's approximate length cap (MAXLEN ~)
-- ARGV[3]  seconds an idempotency key is remembered
-- ARGV[4]  the prefix of idempotency keys
-- then four per message: idempotency key, author, message (base64), sent stamp
--
-- Returns { epoch, r1, r2, ... }: for each message its id, negated when the
-- key was already stored (a retry: nothing new was written).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local out = { epoch }
for i = 5, #ARGV, 4 do
  local key = ARGV[i]
  local idem = nil
  local prev = nil
  if key ~= '' then
    idem = ARGV[4] .. key
    prev = redis.call('GET', idem)
  end
  if prev then
    out[#out + 1] = -tonumber(prev)
  else
    local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id .. '-0',
      'a', ARGV[i + 1], 'm', ARGV[i + 2], 't', ARGV[i + 3])
    if idem then
      redis.call('SET', idem, id, 'EX', ARGV[3])
    end
    out[#out + 1] = id
  end
end
return out
