"""The Lua scripts of the Redis store's reservation books: admit, finish (settle),
cancel, reap, and the registry of a process's book tags (see ``redis.py``)."""

from __future__ import annotations

from extproc.store.base import OWNER_CHARS, SPEND_TAG

__all__ = [
    "ADMIT",
    "CANCEL",
    "FINISH",
    "REAP",
    "REAP_BATCH",
    "REAP_ROUNDS",
    "REGISTER",
]

# Budget reservations. A budget key may carry any hash tag; the reservation book of
# a hold lives in the slot of its keys: for the tag T of a key (``book_tag``), the
# hash ``T:reservations``, its expiry zset, the owners' sets of open ids and the ended
# markers, all built from T. A script touches the books of the slots it was sent
# (one on Redis Cluster, any number on a single Redis). A reservation is one entry per
# book (JSON: amount, the keys of that slot, and each key's PEXPIRETIME when reserved —
# its window's identity, and the set of its owner's open ids, ``o``) plus its expiry
# in the book's sorted set; expired ones are given back first, a few per call, and a
# dead owner's by the reaper, so a crashed process cannot hold budget for long. A hold
# is only ever taken back from, or settled into, the window it was added to: if the key
# has rolled over since, the old window is gone and the new one never held it.
# Spend values are settled + reserved micro-dollars; beside each budget key a "held"
# counter (``T#held|`` .. key, same tag, same expiry) sums its open holds, so a
# settlement can say what is settled (value - held) without reading every hold.
#
# Rules: amounts travel as the decimal strings the caller sent (ARGV) and are stored
# as strings in the entry, never as Lua numbers (doubles; cjson keeps only 14 digits).
# Every counter a script writes is checked to be of its type before the script writes
# anything, so a script that fails has changed nothing (Redis does not roll a script
# back).
_RESV_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- a counter's value (0 when absent), or nil when the key holds anything else
local function counter(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then return nil end
  if not v then return 0 end
  if not string.match(v, '^%-?%d+$') or string.len(v) > 18 then return nil end
  return tonumber(v)
end
-- the book tag of a key (see book_tag): its own hash tag, else {spend}
local function tag_of(key) return string.match(key, '^{[^}]+}') or '"""
_RESV_LIB += (
    SPEND_TAG
    + """' end
local function held(key) return tag_of(key) .. '#held|' .. key end
local function same_window(key, expires)
  return redis.call('EXISTS', key) == 1 and redis.call('PEXPIRETIME', key) == expires
end
local function take_back(key, amount)
  if redis.call('DECRBY', key, amount) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end
-- give a hold back to a key and its held counter (a held counter that is gone, or
-- not a counter, is left alone: holds taken before it existed)
local function release(key, amount)
  take_back(key, amount)
  local h = held(key)
  if redis.call('EXISTS', h) == 1 and counter(h) then take_back(h, amount) end
end
local function drop(resv, expiry, id)
  local raw = redis.call('HGET', resv, id)
  if raw then
    local entry = cjson.decode(raw)
    for i, key in ipairs(entry.k) do
      -- best effort: a counter that is not an integer is left alone
      if same_window(key, entry.e[i]) and counter(key) then release(key, tostring(entry.a)) end
    end
    redis.call('HDEL', resv, id)
    if entry.o then redis.call('SREM', entry.o, id) end
  end
  redis.call('ZREM', expiry, id)
  return raw
end
-- the settled part of a budget's value: not what open holds have added
local function settled(key)
  return math.max(0, (counter(key) or 0) - (counter(held(key)) or 0))
end
local function add(key, amount, ttl)
  redis.call('INCRBY', key, amount)
  if ttl > 0 and redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ttl) end
end
-- KEYS and ARGV are read in order
local ki, ai = 0, 0
local function key() ki = ki + 1 return KEYS[ki] end
local function arg() ai = ai + 1 return ARGV[ai] end
-- a book's keys: hash, expiry zset, the id's ended marker
local function read_book(first)
  local book = {first = first}
  book.resv = key()
  book.expiry = key()
  book.ended = key()
  return book
end
-- steps (see _add_step in redis.py): c count, x ceiling, t take, g gauge, r release
local function read_steps(n)
  local steps = {}
  for s = 1, n do
    -- one argument per statement: Lua leaves the order of a list's evaluation open
    local st = {}
    st.kind = arg()
    st.key = key()
    if st.kind == 'c' then
      st.amount = arg()
      st.ttl = tonumber(arg())
      st.limit = tonumber(arg())
    elseif st.kind == 'x' then
      st.limit = tonumber(arg())
    elseif st.kind == 't' then
      st.member = arg()
      st.limit = tonumber(arg())
      st.ttl = tonumber(arg())
    elseif st.kind == 'g' then
      st.amount = arg()
      st.ttl = tonumber(arg())
    else
      st.member = arg()
    end
    if (st.kind == 'c' or st.kind == 'g') and arg() == '1' then
      st.marker = key()
      st.keep = tonumber(arg())
    end
    steps[s] = st
  end
  return steps
end
-- nil when every step's key is of its type, else the error reply
local function check_steps(steps)
  for i, st in ipairs(steps) do
    if st.kind == 't' or st.kind == 'r' then
      local t = redis.call('TYPE', st.key)['ok']
      if t ~= 'zset' and t ~= 'none' then
        return redis.error_reply('lease set of step ' .. i .. ' is not a sorted set')
      end
    elseif not counter(st.key) then
      return redis.error_reply('counter of step ' .. i .. ' is not an integer')
    end
  end
  return nil
end
-- run one step: its result, and whether it refused
local function run_step(st, now, dead)
  if st.kind == 'c' then
    if st.marker and redis.call('EXISTS', st.marker) == 1 then
      local v = counter(st.key) or 0
      return {v, math.max(0, redis.call('PTTL', st.key)), 0}, st.limit >= 0 and v > st.limit
    end
    local v = redis.call('INCRBY', st.key, st.amount)
    local ttl = redis.call('PTTL', st.key)
    if ttl < 0 then
      redis.call('PEXPIRE', st.key, st.ttl)
      ttl = st.ttl
    end
    if st.marker then redis.call('SET', st.marker, 1, 'PX', st.keep) end
    return {v, ttl, 1}, st.limit >= 0 and v > st.limit
  elseif st.kind == 'x' then
    local v = counter(st.key) or 0
    return v, v >= st.limit
  elseif st.kind == 't' then
    redis.call('ZREMRANGEBYSCORE', st.key, '-inf', now)
    local n = redis.call('ZCARD', st.key)
    local reaped = 0
    if n >= st.limit and next(dead) then
      for _, m in ipairs(redis.call('ZRANGE', st.key, 0, -1)) do
        if dead[string.sub(m, 1, """
)
_RESV_LIB += (
    str(OWNER_CHARS)
    + """)] then
          redis.call('ZREM', st.key, m)
          reaped = reaped + 1
        end
      end
      n = n - reaped
    end
    if n >= st.limit then return {0, n, reaped}, true end
    redis.call('ZADD', st.key, now + st.ttl, st.member)
    redis.call('PEXPIRE', st.key, st.ttl)
    return {1, n + 1, reaped}, false
  elseif st.kind == 'g' then
    if st.marker and redis.call('EXISTS', st.marker) == 1 then
      return counter(st.key) or 0, false
    end
    local v = redis.call('INCRBY', st.key, st.amount)
    if v < 0 then
      redis.call('SET', st.key, 0, 'KEEPTTL')
      v = 0
    end
    redis.call('PEXPIRE', st.key, st.ttl)
    if st.marker then redis.call('SET', st.marker, 1, 'PX', st.keep) end
    return v, false
  end
  redis.call('ZREM', st.key, st.member)
  return 0, false
end
"""
)

# Admission (see RedisStore.admit). ARGV: id, amount, hold ms, marker ms, books, steps,
# dead owners, each dead owner; per book: 1 with an owner set else 0, budgets, then
# (limit (-1: none), ttl ms (0: none)) per budget; the steps; 1 with a registry of
# book tags else 0 (then its ttl ms). KEYS: per book: hash, expiry zset, the id's ended
# marker, [the owner's set], budget keys...; the steps' keys; [the registry].
# → {0 or the 1-based index of the budget found spent, 0 or the 1-based index of the
# step that refused, {spends before this call...}, {each step's result...}}.
# Rule: an id that is held or has ended in any book is refused before anything is
# written (an admission the client gave up on may run after its cancel or settlement).
ADMIT = (
    _RESV_LIB
    + """
local rid = arg()
local amount = arg()
local hold = tonumber(arg())
local keep = tonumber(arg())
local nbooks = tonumber(arg())
local nsteps = tonumber(arg())
local ndead = tonumber(arg())
local dead = {}
for _ = 1, ndead do dead[arg()] = true end
local books, budgets = {}, {}
for b = 1, nbooks do
  local book = read_book(#budgets + 1)
  if arg() == '1' then book.owners = key() end
  for _ = 1, tonumber(arg()) do
    local budget = {}
    budget.key = key()
    budget.limit = tonumber(arg())
    budget.ttl = tonumber(arg())
    budgets[#budgets + 1] = budget
  end
  book.last = #budgets
  books[b] = book
end
local steps = read_steps(nsteps)
local registry, registry_ms
if arg() == '1' then
  registry = key()
  registry_ms = tonumber(arg())
end
for _, book in ipairs(books) do
  if redis.call('EXISTS', book.ended) == 1 or redis.call('HEXISTS', book.resv, rid) == 1 then
    return redis.error_reply('reservation id already used')
  end
end
local now = now_ms()
for _, book in ipairs(books) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', book.expiry, '-inf', now, 'LIMIT', 0, 32)) do
    drop(book.resv, book.expiry, id)
  end
end
local spends = {}
for i, b in ipairs(budgets) do
  spends[i] = counter(b.key)
  if not (spends[i] and counter(held(b.key))) then
    return redis.error_reply('budget counter ' .. i .. ' is not an integer')
  end
end
local bad = check_steps(steps)
if bad then return bad end
for i, b in ipairs(budgets) do
  if b.limit >= 0 and spends[i] >= b.limit then return {i, 0, spends, {}} end
end
for _, book in ipairs(books) do
  local keys, windows = {}, {}
  for i = book.first, book.last do
    local k = budgets[i].key
    add(k, amount, budgets[i].ttl)
    local w = redis.call('PEXPIRETIME', k)
    keys[#keys + 1], windows[#windows + 1] = k, w
    -- the held counter lives exactly as long as the window it counts holds of
    redis.call('INCRBY', held(k), amount)
    if w > 0 then redis.call('PEXPIREAT', held(k), w) end
  end
  local entry = {a = amount, k = keys, e = windows, o = book.owners}
  redis.call('HSET', book.resv, rid, cjson.encode(entry))
  redis.call('ZADD', book.expiry, now + hold, rid)
  if book.owners then
    -- the set outlives every hold it lists
    redis.call('SADD', book.owners, rid)
    if redis.call('PTTL', book.owners) < hold then redis.call('PEXPIRE', book.owners, hold) end
  end
  if registry then redis.call('SADD', registry, tag_of(book.resv)) end
end
if registry and redis.call('PTTL', registry) < registry_ms then
  redis.call('PEXPIRE', registry, registry_ms)
end
local results, taken, refused = {}, {}, 0
for i, st in ipairs(steps) do
  local res, no = run_step(st, now, dead)
  results[i] = res
  if no then
    refused = i
    break
  end
  if st.kind == 't' then taken[#taken + 1] = st end
end
if refused > 0 then
  for _, book in ipairs(books) do
    drop(book.resv, book.expiry, rid)
    redis.call('SET', book.ended, 1, 'PX', keep)
  end
  for _, st in ipairs(taken) do redis.call('ZREM', st.key, st.member) end
end
return {0, refused, spends, results}
"""
)

# Finishing (settle, see RedisStore.finish). ARGV: id, real cost, marker ms, books,
# steps; per book: budgets, then a ttl ms (0: none) per budget; the steps. KEYS: per
# book: hash, expiry zset, the id's ended marker, budget keys...; the steps' keys.
# A live reservation is replaced by the real cost; where it has expired (already given
# back) or its window has rolled over, the cost is charged in full. Rule: a book where
# the id has ended is settled already (a retry whose first answer was lost): nothing
# changes there. → {{each budget's settled value after it...}, {each step's result}}
FINISH = (
    _RESV_LIB
    + """
local rid = arg()
local cost = arg()
local keep = arg()
local nbooks = tonumber(arg())
local nsteps = tonumber(arg())
local books, budgets = {}, {}
for b = 1, nbooks do
  local book = read_book(#budgets + 1)
  for _ = 1, tonumber(arg()) do
    local budget = {}
    budget.key = key()
    budget.ttl = tonumber(arg())
    budgets[#budgets + 1] = budget
  end
  book.last = #budgets
  books[b] = book
end
local steps = read_steps(nsteps)
for i, b in ipairs(budgets) do
  if not (counter(b.key) and counter(held(b.key))) then
    return redis.error_reply('budget counter ' .. i .. ' is not an integer')
  end
end
local bad = check_steps(steps)
if bad then return bad end
for _, book in ipairs(books) do
  if redis.call('EXISTS', book.ended) == 0 then
    local raw = redis.call('HGET', book.resv, rid)
    local entry = raw and cjson.decode(raw)
    for i = book.first, book.last do
      local k, j = budgets[i].key, i - book.first + 1
      if entry and entry.k[j] == k and same_window(k, entry.e[j]) then
        redis.call('INCRBY', k, cost)
        release(k, tostring(entry.a))
      else
        add(k, cost, budgets[i].ttl)
      end
    end
    if raw then
      redis.call('HDEL', book.resv, rid)
      redis.call('ZREM', book.expiry, rid)
      if entry.o then redis.call('SREM', entry.o, rid) end
    end
    redis.call('SET', book.ended, 1, 'PX', keep)
  end
end
local out = {}
for i, b in ipairs(budgets) do out[i] = settled(b.key) end
local now = now_ms()
local results = {}
for i, st in ipairs(steps) do results[i] = run_step(st, now, {}) end
return {out, results}
"""
)

# KEYS: per book: hash, expiry zset, the id's ended marker; ARGV: id, marker ms. An
# id never reserved in a book is only marked there (a reserve of it that runs late is
# then refused). → the number of holds given back
CANCEL = (
    _RESV_LIB
    + """
local n = 0
for b = 1, #KEYS, 3 do
  if redis.call('EXISTS', KEYS[b + 2]) == 0 then
    if drop(KEYS[b], KEYS[b + 1], ARGV[1]) then n = n + 1 end
    redis.call('SET', KEYS[b + 2], 1, 'PX', ARGV[2])
  end
end
return n
"""
)

# A dead process's holds in one book, a batch per call, each given back as a cancel
# would (drop). KEYS: resv hash, expiry zset, the owner's set of open ids; ARGV: batch
# size → {holds given back, ids left}. Rule: two reapers of one owner never give a
# hold back twice (drop finds it gone).
REAP = (
    _RESV_LIB
    + """
local n = 0
for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[3], tonumber(ARGV[1]))) do
  if drop(KEYS[1], KEYS[2], id) then n = n + 1 end
  redis.call('SREM', KEYS[3], id)
end
return {n, redis.call('SCARD', KEYS[3])}
"""
)

# The registry of a process's book tags (KEYS[1]): ARGV: ttl ms, tags... Rule: its
# expiry is only ever pushed later.
REGISTER = """
redis.call('SADD', KEYS[1], unpack(ARGV, 2))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""
#: Holds one reap script gives back (a few milliseconds of Redis time).
REAP_BATCH = 256
#: Batches one reap sends at most (each takes ids off the set, so this ends).
REAP_ROUNDS = 1000
