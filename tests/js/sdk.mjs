// E2B's JS SDK (npm `e2b`, unmodified) against `kiln serve`: tests/tests/serve_js_sdk.rs
// runs one PART of this script per test (it prepends `const PART = '...'`), each against its
// own daemon and gVisor sandbox, and asserts on the JSON line printed last. The script
// records what happened; the Rust side judges it (except where waiting needs a condition).
import { Sandbox, CommandExitError, NotFoundError, FilesystemEventType } from 'e2b'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Waits until `pred()` holds (at most `ms`); false if it never did. */
async function until(pred, ms = 30000) {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await pred()) return true
    await sleep(100)
  }
  return false
}

/** What a rejected promise threw, as {name, exitCode, message}; null when it resolved. */
async function thrown(p) {
  try {
    await p
    return null
  } catch (e) {
    return { name: e.constructor.name, exitCode: e.exitCode ?? null, message: String(e.message) }
  }
}

const out = {}
const sbx = await Sandbox.create('sdk', { timeoutMs: 300000 })
out.id = sbx.sandboxId

if (PART === 'commands') {
  // Streaming: the process prints, then blocks on stdin; what it printed before blocking
  // arrives while it is blocked (so incrementally), on the right stream.
  const stdout = []
  const stderr = []
  const h = await sbx.commands.run(
    'echo out1; echo err1 >&2; read a; echo "got $a"; echo err2 >&2; read b; echo "got $b"; exit 3',
    {
      background: true,
      stdin: true,
      onStdout: (d) => stdout.push(d),
      onStderr: (d) => stderr.push(d),
    },
  )
  out.pid = h.pid
  out.first = await until(() => stdout.join('').includes('out1') && stderr.join('').includes('err1'))
  out.beforeInput = { stdout: stdout.join(''), stderr: stderr.join('') }
  await sbx.commands.sendStdin(h.pid, 'hello\n')
  out.second = await until(() => stdout.join('').includes('got hello'))
  out.afterFirstInput = { stdout: stdout.join(''), stderr: stderr.join('') }
  await h.sendStdin('world\n')
  const end = await thrown(h.wait())
  out.end = end
  out.final = { stdout: stdout.join(''), stderr: stderr.join(''), hStdout: h.stdout, hStderr: h.stderr }

  // Output over time: each line arrives in its own callback.
  const ticks = []
  const r = await sbx.commands.run('for i in 1 2 3; do echo tick$i; sleep 0.4; done', {
    onStdout: (d) => ticks.push(d),
  })
  out.ticks = ticks
  out.ticksResult = { exitCode: r.exitCode, stdout: r.stdout }

  // Background, wait(): the result of a process that ends by itself.
  const bg = await sbx.commands.run('sleep 1; echo done', { background: true })
  const done = await bg.wait()
  out.waited = { exitCode: done.exitCode, stdout: done.stdout }

  // Background, kill(): listed while it runs, killed, gone from the list, wait() throws.
  const long = await sbx.commands.run('sleep 600', { background: true })
  out.listedBefore = (await sbx.commands.list()).some((p) => p.pid === long.pid)
  out.killed = await long.kill()
  out.killedWait = await thrown(long.wait())
  out.listedAfter = (await sbx.commands.list()).some((p) => p.pid === long.pid)
  out.killAgain = await sbx.commands.kill(long.pid)
  // A foreground command's failure.
  out.exit7 = await thrown(sbx.commands.run('echo bad >&2; exit 7'))

  // closeStdin: EOF reaches the process.
  const cat = await sbx.commands.run('cat; echo eof', { background: true, stdin: true })
  await cat.sendStdin('piped\n')
  await sbx.commands.closeStdin(cat.pid)
  const catDone = await cat.wait()
  out.cat = { exitCode: catDone.exitCode, stdout: catDone.stdout }

  // commands.connect: a second client of a running process gets what it prints from then on.
  const slow = await sbx.commands.run('read go; echo after-connect', { background: true, stdin: true })
  const seenByConnect = []
  const again = await sbx.commands.connect(slow.pid, { onStdout: (d) => seenByConnect.push(d) })
  await slow.sendStdin('x\n')
  const connected = await again.wait()
  out.connected = { exitCode: connected.exitCode, stdout: connected.stdout, callbacks: seenByConnect.join('') }

  // A PTY: input typed, output echoed back through onData, killed.
  const dec = new TextDecoder()
  let ptyOut = ''
  const pty = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { ptyOut += dec.decode(d) } })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('echo pty-$((6*7))\n'))
  out.ptyEchoed = await until(() => ptyOut.includes('pty-42'))
  out.ptyKilled = await pty.kill()
}

if (PART === 'files') {
  const dir = '/home/app/w'
  await sbx.files.makeDir(dir)
  const events = []
  const watch = await sbx.files.watchDir(dir, (e) => events.push([e.name, e.type]))
  const seen = (name, type) => events.some(([n, t]) => n === name && t === type)

  // Made by files.write: created and written.
  const info = await sbx.files.write(`${dir}/a.txt`, 'alpha\n')
  out.writeInfo = { name: info.name, path: info.path, type: info.type }
  out.aCreated = await until(() => seen('a.txt', FilesystemEventType.CREATE) && seen('a.txt', FilesystemEventType.WRITE))
  // Made by a command in the sandbox.
  await sbx.commands.run(`echo beta > ${dir}/b.txt`)
  out.bWritten = await until(() => seen('b.txt', FilesystemEventType.CREATE) && seen('b.txt', FilesystemEventType.WRITE))
  await sbx.commands.run(`rm ${dir}/b.txt`)
  out.bRemoved = await until(() => seen('b.txt', FilesystemEventType.REMOVE))
  // Renamed and removed through the SDK.
  const moved = await sbx.files.rename(`${dir}/a.txt`, `${dir}/c.txt`)
  out.moved = { name: moved.name, path: moved.path }
  out.aRenamed = await until(() => seen('a.txt', FilesystemEventType.RENAME) && seen('c.txt', FilesystemEventType.CREATE))
  out.cContent = await sbx.files.read(`${dir}/c.txt`)
  await sbx.files.remove(`${dir}/c.txt`)
  out.cRemoved = await until(() => seen('c.txt', FilesystemEventType.REMOVE))
  // Recursive, with entries: a file in a subdirectory made after the watch started.
  const deep = []
  const rwatch = await sbx.files.watchDir(dir, (e) => deep.push(e), { recursive: true, includeEntry: true })
  await sbx.files.makeDir(`${dir}/sub`)
  await sbx.files.write(`${dir}/sub/n.txt`, 'nested')
  out.deepWritten = await until(() => deep.some((e) => e.name === 'sub/n.txt' && e.type === FilesystemEventType.WRITE))
  const w = deep.find((e) => e.name === 'sub/n.txt' && e.type === FilesystemEventType.WRITE)
  out.deepEntry = w && w.entry ? { path: w.entry.path, size: w.entry.size, type: w.entry.type } : null
  out.deepNames = [...new Set(deep.map((e) => e.name))].sort()
  await rwatch.stop()
  await sbx.files.remove(`${dir}/sub`)
  out.subRemoved = await until(() => seen('sub', FilesystemEventType.REMOVE))
  await watch.stop()
  await sbx.files.write(`${dir}/after-stop.txt`, 'x')
  await sleep(500)
  out.events = events

  // Read, write, list, info, exists, remove, rename with their outcomes.
  const bytes = new Uint8Array([0, 1, 2, 250, 255])
  await sbx.files.write('/home/app/d/bin.dat', bytes)
  out.bytesBack = Array.from(await sbx.files.read('/home/app/d/bin.dat', { format: 'bytes' }))
  await sbx.files.write([
    { path: '/home/app/d/one.txt', data: 'one' },
    { path: '/home/app/d/two.txt', data: 'two two' },
  ])
  out.list = (await sbx.files.list('/home/app/d')).map((e) => [e.name, e.type, e.size]).sort()
  const gi = await sbx.files.getInfo('/home/app/d/two.txt')
  out.getInfo = { name: gi.name, type: gi.type, size: gi.size, path: gi.path }
  out.exists = [await sbx.files.exists('/home/app/d/one.txt'), await sbx.files.exists('/home/app/d/none')]
  await sbx.files.rename('/home/app/d/one.txt', '/home/app/d/uno.txt')
  out.afterRename = [await sbx.files.exists('/home/app/d/one.txt'), await sbx.files.read('/home/app/d/uno.txt')]
  await sbx.files.remove('/home/app/d')
  out.afterRemove = await sbx.files.exists('/home/app/d')
  out.readMissing = await thrown(sbx.files.read('/home/app/d/uno.txt'))
  out.shellSees = (await sbx.commands.run('ls /home/app; cat /home/app/w/after-stop.txt')).stdout
}

if (PART === 'pause') {
  // A file and a counter that lives in a shell's memory (written out as it counts).
  await sbx.files.write('/home/app/kept.txt', 'kept across pause\n')
  const counter = await sbx.commands.run(
    'i=1000; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done',
    { background: true, timeoutMs: 0 },
  )
  const count = async (s) => parseInt((await s.files.read('/tmp/count')).trim() || '0', 10)
  await until(async () => (await sbx.files.exists('/tmp/count')) && (await count(sbx)) >= 1005)
  out.beforePause = await count(sbx)
  out.paused = await sbx.pause()
  out.pausedAgain = await Sandbox.pause(sbx.sandboxId)
  out.stateWhilePaused = (await Sandbox.getInfo(sbx.sandboxId)).state
  out.runningWhilePaused = await sbx.isRunning()
  const back = await Sandbox.connect(sbx.sandboxId)
  out.stateAfter = (await back.getInfo()).state
  out.afterResume = await count(back)
  out.counted = await until(async () => (await count(back)) > out.afterResume + 2)
  out.later = await count(back)
  out.kept = await back.files.read('/home/app/kept.txt')
  out.counterListed = (await back.commands.list()).some((p) => p.pid === counter.pid)

  // betaPause: the deprecated name, same effect; connect on the instance resumes.
  out.betaPaused = await back.betaPause()
  out.stateBeta = (await Sandbox.getInfo(back.sandboxId)).state
  await back.connect()
  out.afterBeta = await count(back)
  out.countedBeta = await until(async () => (await count(back)) > out.afterBeta + 2)
  out.counterListedBeta = (await back.commands.list()).some((p) => p.pid === counter.pid)
  await back.commands.kill(counter.pid)
}

if (PART === 'lifecycle') {
  const info = await sbx.getInfo()
  out.info = {
    sandboxId: info.sandboxId,
    templateId: info.templateId,
    state: info.state,
    cpuCount: info.cpuCount,
    memoryMB: info.memoryMB,
    envdVersion: info.envdVersion,
    spanMs: info.endAt.getTime() - info.startedAt.getTime(),
  }
  await sbx.setTimeout(600000)
  out.endAfterSet = (await sbx.getInfo()).endAt.getTime() - Date.now()
  await Sandbox.setTimeout(sbx.sandboxId, 400000)
  out.endAfterStaticSet = (await Sandbox.getInfo(sbx.sandboxId)).endAt.getTime() - Date.now()
  // A short timeout: the sandbox goes when it expires.
  await sbx.setTimeout(3000)
  out.runningBeforeExpiry = await sbx.isRunning()
  out.expired = await until(async () => !(await sbx.isRunning()), 60000)
  out.infoAfterExpiry = await thrown(Sandbox.getInfo(sbx.sandboxId))
  out.killAfterExpiry = await Sandbox.kill(sbx.sandboxId)
}

if (PART === 'more') {
  const tryIt = async (name, f) => {
    try {
      out[name] = { ok: await f() }
    } catch (e) {
      out[name] = { err: `${e.constructor.name}: ${e.message}` }
    }
  }
  await tryIt('rootRun', async () => (await sbx.commands.run('id -un; pwd; echo $X', { user: 'root', cwd: '/tmp', envs: { X: 'y' } })).stdout)
  await tryIt('downloadUrl', async () => {
    await sbx.files.write('/home/app/dl.txt', 'download me')
    const url = await sbx.downloadUrl('/home/app/dl.txt')
    const r = await fetch(url)
    return [r.status, await r.text()]
  })
  await tryIt('uploadUrl', async () => {
    const url = await sbx.uploadUrl('/home/app/up.txt')
    const fd = new FormData()
    fd.append('file', new Blob(['uploaded']), 'up.txt')
    const r = await fetch(url, { method: 'POST', body: fd })
    return [r.status, await sbx.files.read('/home/app/up.txt')]
  })
  await tryIt('listRunning', async () => (await Sandbox.list({ query: { state: ['running'] } }).nextItems()).map((s) => s.state))
  await tryIt('snapshot', async () => {
    const snap = await sbx.createSnapshot()
    const list = await Sandbox.listSnapshots().nextItems()
    return [typeof snap.snapshotId, list.length]
  })
  await tryIt('fsPause', async () => {
    await sbx.files.write('/home/app/fs.txt', 'fs kept')
    const p = await sbx.pause({ keepMemory: false })
    const back = await Sandbox.connect(sbx.sandboxId)
    return [p, await back.files.read('/home/app/fs.txt')]
  })
  await tryIt('writeMeta', async () => {
    const info = await sbx.files.write('/home/app/m.txt', 'm', { metadata: { k: 'v' } })
    return [info.metadata ?? null, (await sbx.files.getInfo('/home/app/m.txt')).metadata ?? null]
  })
  await tryIt('runTimeout', async () => {
    const e = await thrown(sbx.commands.run('sleep 10', { timeoutMs: 1000 }))
    return e
  })
  await tryIt('missingCwd', async () => await thrown(sbx.commands.run('pwd', { cwd: '/nope' })))
  await tryIt('fork', async () => {
    const forks = await sbx.fork({ count: 1 })
    const f = forks[0]
    if (f instanceof Error) return String(f)
    const r = (await f.files.read('/home/app/fs.txt'))
    await f.kill()
    return r
  })
}

if (PART !== 'lifecycle') await sbx.kill()
console.log(JSON.stringify(out))
