/**
 * A tiny WebAssembly assembler: just enough to hand-write a few SIMD loops (./simd-kernels.ts) that run on the
 * tfjs wasm backend's own memory. A module has one imported memory ("env"."memory") and functions whose
 * parameters and locals are i32 / f32 / v128; bodies are built with structured control flow (block / loop / if)
 * and named labels, so branch depths are computed rather than counted by hand.
 */

export const I32 = 0x7f;
export const F32 = 0x7d;
export const V128 = 0x7b;
export type ValType = typeof I32 | typeof F32 | typeof V128;

function uleb(n: number, out: number[]): void {
  let v = n >>> 0;
  do {
    let b = v & 0x7f;
    v >>>= 7;
    if (v !== 0) b |= 0x80;
    out.push(b);
  } while (v !== 0);
}

function sleb(n: number, out: number[]): void {
  let v = n | 0;
  for (;;) {
    const b = v & 0x7f;
    v >>= 7;
    const done = (v === 0 && (b & 0x40) === 0) || (v === -1 && (b & 0x40) !== 0);
    out.push(done ? b : b | 0x80);
    if (done) return;
  }
}

function str(s: string, out: number[]): void {
  const bytes = new TextEncoder().encode(s);
  uleb(bytes.length, out);
  for (const b of bytes) out.push(b);
}

/** A branch target; `br(label)` computes its relative depth. */
export interface Label {
  readonly kind: 'block' | 'loop' | 'if';
}

/** A function body under construction. Locals are referred to by name. */
export class Fn {
  readonly code: number[] = [];
  private readonly names = new Map<string, number>();
  private readonly localTypes: ValType[] = [];
  private readonly labels: Label[] = [];

  constructor(
    readonly name: string,
    readonly params: ReadonlyArray<readonly [string, ValType]>,
    readonly results: readonly ValType[] = [],
  ) {
    params.forEach(([n], i) => this.names.set(n, i));
  }

  /** Declares locals (all of one type). */
  locals(type: ValType, ...names: string[]): this {
    for (const n of names) {
      if (this.names.has(n)) throw new Error(`wasm-asm ${this.name}: local ${n} declared twice`);
      this.names.set(n, this.params.length + this.localTypes.length);
      this.localTypes.push(type);
    }
    return this;
  }

  private idx(name: string): number {
    const i = this.names.get(name);
    if (i === undefined) throw new Error(`wasm-asm ${this.name}: unknown local ${name}`);
    return i;
  }

  private op(...bytes: number[]): this {
    for (const b of bytes) this.code.push(b);
    return this;
  }

  get(name: string): this {
    this.code.push(0x20);
    uleb(this.idx(name), this.code);
    return this;
  }
  set(name: string): this {
    this.code.push(0x21);
    uleb(this.idx(name), this.code);
    return this;
  }
  tee(name: string): this {
    this.code.push(0x22);
    uleb(this.idx(name), this.code);
    return this;
  }
  i32(n: number): this {
    this.code.push(0x41);
    sleb(n, this.code);
    return this;
  }
  f32(x: number): this {
    this.code.push(0x43);
    const b = new Uint8Array(new Float32Array([x]).buffer);
    for (const v of b) this.code.push(v);
    return this;
  }
  drop(): this {
    return this.op(0x1a);
  }

  // i32 arithmetic / comparisons
  add(): this {
    return this.op(0x6a);
  }
  sub(): this {
    return this.op(0x6b);
  }
  mul(): this {
    return this.op(0x6c);
  }
  shl(): this {
    return this.op(0x74);
  }
  divU(): this {
    return this.op(0x6e);
  }
  eqz(): this {
    return this.op(0x45);
  }
  eq(): this {
    return this.op(0x46);
  }
  ne(): this {
    return this.op(0x47);
  }
  ltS(): this {
    return this.op(0x48);
  }
  ltU(): this {
    return this.op(0x49);
  }
  gtS(): this {
    return this.op(0x4a);
  }
  geS(): this {
    return this.op(0x4e);
  }
  geU(): this {
    return this.op(0x4f);
  }
  leS(): this {
    return this.op(0x4c);
  }
  and(): this {
    return this.op(0x71);
  }
  /** select(a, b, cond): a if cond else b. */
  select(): this {
    return this.op(0x1b);
  }

  i32Load(offset = 0): this {
    this.op(0x28, 2);
    uleb(offset, this.code);
    return this;
  }
  i32Store(offset = 0): this {
    this.op(0x36, 2);
    uleb(offset, this.code);
    return this;
  }

  // f32 scalar
  f32Load(offset = 0): this {
    this.op(0x2a, 2);
    uleb(offset, this.code);
    return this;
  }
  f32Store(offset = 0): this {
    this.op(0x38, 2);
    uleb(offset, this.code);
    return this;
  }
  f32Add(): this {
    return this.op(0x92);
  }
  f32Mul(): this {
    return this.op(0x94);
  }
  f32Sub(): this {
    return this.op(0x93);
  }

  // SIMD
  private simd(code: number): this {
    this.code.push(0xfd);
    uleb(code, this.code);
    return this;
  }
  v128Load(offset = 0): this {
    this.simd(0x00);
    uleb(0, this.code); // alignment hint 1: the data may be unaligned
    uleb(offset, this.code);
    return this;
  }
  v128Store(offset = 0): this {
    this.simd(0x0b);
    uleb(0, this.code);
    uleb(offset, this.code);
    return this;
  }
  /** Loads one f32 and splats it to the four lanes. */
  load32Splat(offset = 0): this {
    this.simd(0x09);
    uleb(0, this.code);
    uleb(offset, this.code);
    return this;
  }
  f32x4Splat(): this {
    return this.simd(0x13);
  }
  f32x4Add(): this {
    return this.simd(0xe4);
  }
  f32x4Mul(): this {
    return this.simd(0xe6);
  }
  f32x4Sub(): this {
    return this.simd(0xe5);
  }
  f32x4Div(): this {
    return this.simd(0xe7);
  }
  f32x4Eq(): this {
    return this.simd(0x41);
  }
  v128And(): this {
    return this.simd(0x4e);
  }
  /** a & ~b */
  v128AndNot(): this {
    return this.simd(0x4f);
  }
  v128Or(): this {
    return this.simd(0x50);
  }
  f32x4ExtractLane(lane: number): this {
    this.simd(0x1f);
    this.code.push(lane);
    return this;
  }
  v128Zero(): this {
    this.simd(0x0c);
    for (let i = 0; i < 16; i++) this.code.push(0);
    return this;
  }

  // Structured control flow.
  private structured(kind: Label['kind'], opcode: number, body: (l: Label) => void): this {
    const label: Label = { kind };
    this.op(opcode, 0x40);
    this.labels.push(label);
    body(label);
    if (this.labels.pop() !== label) throw new Error(`wasm-asm ${this.name}: unbalanced control flow`);
    return this.op(0x0b);
  }
  block(body: (l: Label) => void): this {
    return this.structured('block', 0x02, body);
  }
  loop(body: (l: Label) => void): this {
    return this.structured('loop', 0x03, body);
  }
  /** `if` on the i32 on the stack (no else branch). */
  if(body: (l: Label) => void): this {
    return this.structured('if', 0x04, body);
  }
  private depth(label: Label): number {
    const i = this.labels.lastIndexOf(label);
    if (i < 0) throw new Error(`wasm-asm ${this.name}: branch to a label that is not enclosing`);
    return this.labels.length - 1 - i;
  }
  br(label: Label): this {
    this.code.push(0x0c);
    uleb(this.depth(label), this.code);
    return this;
  }
  brIf(label: Label): this {
    this.code.push(0x0d);
    uleb(this.depth(label), this.code);
    return this;
  }

  /**
   * for (name = from; name < to; name += step) body(continueLabel, breakLabel). `from`, `to` and `step` push an
   * i32 (e.g. `f => f.get('n')`); the loop is skipped when from >= to. Signed comparison.
   */
  for(name: string, from: (f: Fn) => void, to: (f: Fn) => void, step: number, body: (next: Label, exit: Label) => void): this {
    from(this);
    this.set(name);
    return this.block((exit) => {
      this.loop((top) => {
        this.get(name);
        to(this);
        this.geS().brIf(exit);
        this.block((next) => body(next, exit));
        this.get(name).i32(step).add().set(name);
        this.br(top);
      });
    });
  }

  /** name += delta (i32). */
  inc(name: string, delta: number | string): this {
    this.get(name);
    if (typeof delta === 'number') this.i32(delta);
    else this.get(delta);
    return this.add().set(name);
  }

  encodeBody(): number[] {
    if (this.labels.length) throw new Error(`wasm-asm ${this.name}: unclosed blocks`);
    const body: number[] = [];
    // Locals, run-length encoded by type.
    const groups: Array<[number, ValType]> = [];
    for (const t of this.localTypes) {
      const last = groups[groups.length - 1];
      if (last && last[1] === t) last[0]++;
      else groups.push([1, t]);
    }
    uleb(groups.length, body);
    for (const [n, t] of groups) {
      uleb(n, body);
      body.push(t);
    }
    for (const b of this.code) body.push(b);
    body.push(0x0b);
    return body;
  }
}

function section(id: number, content: number[], out: number[]): void {
  out.push(id);
  uleb(content.length, out);
  for (const b of content) out.push(b);
}

/**
 * Encodes a module: memory imported as env.memory, every function exported under its name. With `sharedMaxPages`
 * the imported memory is a shared one (threads) of at most that many 64 KiB pages.
 */
export function assemble(fns: Fn[], opts: { sharedMaxPages?: number } = {}): Uint8Array {
  const out: number[] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
  // Types: one per function (duplicates are allowed).
  const types: number[] = [];
  uleb(fns.length, types);
  for (const f of fns) {
    types.push(0x60);
    uleb(f.params.length, types);
    for (const [, t] of f.params) types.push(t);
    uleb(f.results.length, types);
    for (const t of f.results) types.push(t);
  }
  section(1, types, out);
  const imports: number[] = [];
  uleb(1, imports);
  str('env', imports);
  str('memory', imports);
  if (opts.sharedMaxPages) {
    imports.push(0x02, 0x03); // memory, shared, with a maximum
    uleb(1, imports);
    uleb(opts.sharedMaxPages, imports);
  } else {
    imports.push(0x02, 0x00); // memory, limits without maximum
    uleb(1, imports);
  }
  section(2, imports, out);
  const funcs: number[] = [];
  uleb(fns.length, funcs);
  fns.forEach((_, i) => uleb(i, funcs));
  section(3, funcs, out);
  const exports: number[] = [];
  uleb(fns.length, exports);
  fns.forEach((f, i) => {
    str(f.name, exports);
    exports.push(0x00);
    uleb(i, exports);
  });
  section(7, exports, out);
  const code: number[] = [];
  uleb(fns.length, code);
  for (const f of fns) {
    const body = f.encodeBody();
    uleb(body.length, code);
    for (const b of body) code.push(b);
  }
  section(10, code, out);
  return new Uint8Array(out);
}
