"""The head-atlas report: one self-contained HTML page (works offline) plus matplotlib PNGs beside it.

``write_report(atlas, out_dir, compare=None)`` writes ``atlas.json``, ``atlas.csv``, ``report.html`` and
``grid_<metric>.png`` / ``roles.png`` / ``depth.png`` (/ ``basin.png``, ``compare.png``). The page embeds the
atlas as JSON inside ``<script type="application/json">`` with ``<``, ``>`` and ``&`` escaped, and its script
builds every element with DOM calls and ``textContent`` (never ``innerHTML``), so token text such as
``<script>`` is shown as text. No CDN, no network: inline CSS, inline JS, SVG.

Opening ``report.html#selftest`` runs a small self-test in the page (click a head, check the view changed,
check no injected script ran) and writes the result as JSON into ``<pre id="selftest">``; the tests read it
with headless Chromium's ``--dump-dom``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atlas import ROLES, HeadAtlas

ROLE_COLORS = {"retrieval": "#d62728", "induction": "#9467bd", "previous-token": "#ff7f0e", "sink": "#1f77b4",
               "local": "#2ca02c", "mixed": "#c7c7c7"}


def embed_json(obj) -> str:
    """JSON safe inside an HTML ``<script>`` element: no ``<``, ``>`` or ``&`` survive literally."""
    s = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:8px 0} h3{font-size:14px;margin:4px 0}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.panel{border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa}
button{margin:2px;padding:3px 8px;border:1px solid #aaa;background:#fff;border-radius:4px;cursor:pointer}
button.on{background:#334;color:#fff}
table{border-collapse:collapse;font-size:12px} td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left}
rect.cell{cursor:pointer} rect.sel{stroke:#000;stroke-width:2}
.small{font-size:12px;color:#555} svg text{font-size:10px;font-family:monospace}
"""

JS = r"""
(function(){
const NS='http://www.w3.org/2000/svg';
const A=JSON.parse(document.getElementById('atlas-data').textContent);
const cEl=document.getElementById('compare-data');
const B=cEl?JSON.parse(cEl.textContent):null;
const ROLE_COLORS=JSON.parse(document.getElementById('role-colors').textContent);
let metric='role', sel=null, probe=Object.keys(A.maps)[0]||null;
function el(tag,attrs,parent,text){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);
  if(text!==undefined)e.textContent=text; if(parent)parent.appendChild(e); return e;}
function h(tag,parent,text){const e=document.createElement(tag); if(text!==undefined)e.textContent=text; if(parent)parent.appendChild(e); return e;}
const STOPS=[[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
function viridis(t){t=Math.max(0,Math.min(1,t));const x=t*(STOPS.length-1),i=Math.min(Math.floor(x),STOPS.length-2),f=x-i;
  const c=STOPS[i].map((v,k)=>Math.round(v+(STOPS[i+1][k]-v)*f));return 'rgb('+c.join(',')+')';}
function diverging(t){t=Math.max(-1,Math.min(1,t));const a=Math.round(255*(1-Math.abs(t)));
  return t>=0?'rgb(255,'+a+','+a+')':'rgb('+a+','+a+',255)';}
function range(M){let lo=Infinity,hi=-Infinity;for(const r of M)for(const v of r)if(v!==null){lo=Math.min(lo,v);hi=Math.max(hi,v);}
  if(lo===Infinity)return[0,1]; if(hi===lo)hi=lo+1e-9; return[lo,hi];}
function fmt(v){return v===null||v===undefined?'n/a':(Math.abs(v)>=100?v.toFixed(1):v.toPrecision(3));}
function grid(svg,atlas,m,clickable,diffWith){
  while(svg.firstChild)svg.removeChild(svg.firstChild);
  const L=atlas.num_layers,H=atlas.num_heads,cs=Math.max(10,Math.min(22,Math.floor(420/Math.max(H,L)))),x0=34,y0=16;
  svg.setAttribute('width',x0+H*cs+8); svg.setAttribute('height',y0+L*cs+8);
  for(let hh=0;hh<H;hh++)el('text',{x:x0+hh*cs+2,y:12},svg,String(hh));
  let M=null,lo=0,hi=1;
  if(m!=='role'){M=atlas.metrics[m]; if(diffWith){M=M.map((r,l)=>r.map((v,k)=>{const w=diffWith.metrics[m][l][k];return v===null||w===null?null:v-w;}));
    const rg=range(M);hi=Math.max(Math.abs(rg[0]),Math.abs(rg[1]))||1;lo=-hi;} else [lo,hi]=range(M);}
  for(let l=0;l<L;l++){el('text',{x:2,y:y0+l*cs+cs*0.75},svg,'L'+l);
    for(let hh=0;hh<H;hh++){let fill,val;
      if(m==='role'){val=atlas.roles[l][hh];fill=ROLE_COLORS[val]||'#ccc';}
      else{val=M[l][hh];fill=val===null?'#eee':(diffWith?diverging(val/hi):viridis((val-lo)/(hi-lo)));}
      const r=el('rect',{x:x0+hh*cs,y:y0+l*cs,width:cs-1,height:cs-1,fill:fill,'class':'cell','data-layer':l,'data-head':hh},svg);
      el('title',{},r,'layer '+l+' head '+hh+': '+(m==='role'?val:fmt(val)));
      if(clickable)r.addEventListener('click',()=>select(l,hh));
      if(sel&&sel[0]===l&&sel[1]===hh&&clickable)r.classList.add('sel');}}
  return [lo,hi];
}
function legend(div,lo,hi,m,isDiff){while(div.firstChild)div.removeChild(div.firstChild);
  if(m==='role'){for(const r of Object.keys(ROLE_COLORS)){const s=h('span',div);s.style.background=ROLE_COLORS[r];s.style.padding='1px 6px';s.style.marginRight='4px';s.textContent=r;}return;}
  const svg=el('svg',{width:260,height:28},div);for(let i=0;i<50;i++)el('rect',{x:i*5,y:0,width:5,height:12,fill:isDiff?diverging(i/24.5-1):viridis(i/49)},svg);
  el('text',{x:0,y:25},svg,fmt(lo));el('text',{x:200,y:25},svg,fmt(hi));}
function renderGrids(){
  const ra=grid(document.getElementById('gridA'),A,metric,true,null);legend(document.getElementById('legendA'),ra[0],ra[1],metric,false);
  if(B){const rb=grid(document.getElementById('gridB'),B,metric,false,null);legend(document.getElementById('legendB'),rb[0],rb[1],metric,false);
    const same=A.num_layers===B.num_layers&&A.num_heads===B.num_heads&&metric!=='role'&&B.metrics[metric];
    const box=document.getElementById('diffbox');box.style.display=same?'block':'none';
    if(same){const rd=grid(document.getElementById('gridD'),B,metric,false,A);legend(document.getElementById('legendD'),rd[0],rd[1],metric,true);}}
  renderDepth();
}
function renderButtons(){const d=document.getElementById('metrics');while(d.firstChild)d.removeChild(d.firstChild);
  for(const m of ['role'].concat(Object.keys(A.metrics))){const b=h('button',d,m);if(m===metric)b.className='on';
    b.addEventListener('click',()=>{metric=m;renderButtons();renderGrids();});}}
function select(l,hh){sel=[l,hh];
  const g=A.num_heads/A.num_kv_heads;
  document.getElementById('detail-title').textContent='Layer '+l+', head '+hh+' (kv head '+Math.floor(hh/g)+') \u2014 '+A.roles[l][hh];
  const t=document.getElementById('detail-metrics');while(t.firstChild)t.removeChild(t.firstChild);
  for(const m of Object.keys(A.metrics)){const tr=h('tr',t);h('td',tr,m);h('td',tr,fmt(A.metrics[m][l][hh]));
    if(B&&B.metrics[m]&&B.num_layers===A.num_layers&&B.num_heads===A.num_heads)h('td',tr,'B: '+fmt(B.metrics[m][l][hh]));}
  renderGrids();renderMap();}
function renderProbeSelect(){const s=document.getElementById('probe');
  for(const p of Object.keys(A.maps)){const o=h('option',s,p);o.value=p;}
  s.addEventListener('change',()=>{probe=s.value;renderMap();});}
function renderMap(){const svg=document.getElementById('map');while(svg.firstChild)svg.removeChild(svg.firstChild);
  if(!sel||!probe)return; const mp=A.maps[probe];const W=mp.weights[sel[0]][sel[1]];const n=W.length;
  const cs=Math.max(6,Math.min(16,Math.floor(520/n))),x0=120,y0=110;
  svg.setAttribute('width',x0+n*cs+10);svg.setAttribute('height',y0+n*cs+10);
  for(let i=0;i<n;i++){const lab=mp.labels[i];
    el('text',{x:x0-4,y:y0+i*cs+cs*0.8,'text-anchor':'end'},svg,lab.slice(0,16));
    el('text',{x:0,y:0,transform:'translate('+(x0+i*cs+cs*0.8)+','+(y0-4)+') rotate(-60)'},svg,lab.slice(0,16));
    let mx=1;for(const v of W[i])mx=Math.max(mx,v);
    for(let j=0;j<n;j++){const v=W[i][j];const r=el('rect',{x:x0+j*cs,y:y0+i*cs,width:cs,height:cs,fill:viridis(Math.sqrt(v/1000)),'class':'mapcell'},svg);
      el('title',{},r,'query '+JSON.stringify(lab)+' \u2192 key '+JSON.stringify(mp.labels[j])+': '+(v/1000).toFixed(3));}}}
function renderDepth(){const svg=document.getElementById('depth');while(svg.firstChild)svg.removeChild(svg.firstChild);
  if(metric==='role')return; const L=A.num_layers,w=360,hgt=160,x0=40;
  const means=A.metrics[metric].map(r=>{const v=r.filter(x=>x!==null);return v.length?v.reduce((a,b)=>a+b,0)/v.length:null;});
  const vals=means.filter(v=>v!==null);if(!vals.length)return;let lo=Math.min(...vals),hi=Math.max(...vals);if(hi===lo)hi=lo+1e-9;
  el('text',{x:0,y:12},svg,metric+' (mean over heads) by layer');el('text',{x:0,y:30},svg,fmt(hi));el('text',{x:0,y:hgt},svg,fmt(lo));
  let d='';means.forEach((v,l)=>{if(v===null)return;const x=x0+l*(w-x0)/Math.max(1,L-1),y=hgt-(v-lo)/(hi-lo)*(hgt-30);d+=(d?'L':'M')+x.toFixed(1)+','+y.toFixed(1);});
  el('path',{d:d,fill:'none',stroke:'#334','stroke-width':2},svg);}
function renderFlow(){const svg=document.getElementById('flow');if(!A.flow)return;const f=A.flow,n=f.labels.length;
  const roll=f.rollout[f.target],fl=f.flow,w=24,x0=10,hgt=120;let mr=Math.max(...roll,1e-9),mf=Math.max(...fl,1e-9);
  svg.setAttribute('width',x0+n*w+20);
  for(let j=0;j<n;j++){const a=roll[j]/mr*hgt*0.45,b=fl[j]/mf*hgt*0.45;
    el('rect',{x:x0+j*w,y:hgt*0.5-a,width:w/2-1,height:a,fill:'#1f77b4'},svg);
    el('rect',{x:x0+j*w+w/2,y:hgt*0.5-b,width:w/2-1,height:b,fill:'#ff7f0e'},svg);
    el('text',{x:0,y:0,transform:'translate('+(x0+j*w+8)+','+(hgt*0.5+8)+') rotate(60)'},svg,f.labels[j].slice(0,12));}}
function summary(){const s=document.getElementById('summary');
  h('div',s,A.num_layers+' layers \u00d7 '+A.num_heads+' heads ('+A.num_kv_heads+' key/value heads), '+(A.is_causal?'causal':'bidirectional')+
    '; probes: '+Object.keys(A.probes).map(p=>p+' ('+A.probes[p].tokens+' tokens)').join(', '));
  const t=h('table',s);const tr=h('tr',t);h('th',tr,'role');h('th',tr,A.model);if(B)h('th',tr,B.model);
  const count=(X)=>{const c={};for(const r of X.roles)for(const v of r)c[v]=(c[v]||0)+1;return c;};const ca=count(A),cb=B?count(B):null;
  for(const r of Object.keys(ROLE_COLORS)){const row=h('tr',t);h('td',row,r);h('td',row,String(ca[r]||0));if(B)h('td',row,String(cb[r]||0));}}
document.getElementById('title').textContent='Head atlas: '+A.model+(B?'  vs  '+B.model:'');
if(B){document.getElementById('boxB').style.display='block';document.getElementById('nameB').textContent=B.model;}
document.getElementById('nameA').textContent=A.model;
summary();renderButtons();renderProbeSelect();renderGrids();renderFlow();
if(location.hash==='#selftest'){
  const res={};res.cells=document.querySelectorAll('#gridA rect.cell').length;
  res.title_before=document.getElementById('detail-title').textContent;res.map_before=document.querySelectorAll('#map rect').length;
  const l=Math.min(1,A.num_layers-1),hh=Math.min(1,A.num_heads-1);
  document.querySelector('#gridA rect[data-layer="'+l+'"][data-head="'+hh+'"]').dispatchEvent(new MouseEvent('click',{bubbles:true}));
  res.title_after=document.getElementById('detail-title').textContent;res.map_after=document.querySelectorAll('#map rect').length;
  res.labels=Array.from(document.querySelectorAll('#map text')).map(t=>t.textContent);
  res.pwned=window.__pwned===true;res.script_tags=document.querySelectorAll('script').length;
  res.compare=!!B;
  const mb=Array.from(document.querySelectorAll('#metrics button')).find(b=>b.textContent==='sink');
  if(mb)mb.dispatchEvent(new MouseEvent('click',{bubbles:true}));
  res.metric_after=metric;res.fills=new Set(Array.from(document.querySelectorAll('#gridA rect.cell')).map(r=>r.getAttribute('fill'))).size;
  res.diff_cells=document.querySelectorAll('#gridD rect.cell').length;
  document.getElementById('selftest').textContent=JSON.stringify(res);}
})();
"""


def render_html(atlas: HeadAtlas, compare: HeadAtlas | None = None) -> str:
    """The report page as a string (self-contained)."""
    data = embed_json(atlas.to_dict())
    cmp = f'<script type="application/json" id="compare-data">{embed_json(compare.to_dict())}</script>' if compare else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attnlab head atlas</title><style>{CSS}</style></head>
<body>
<h1 id="title"></h1><div id="summary" class="small"></div>
<h2>Head grids</h2><div class="small">Rows are layers, columns heads. Pick a metric; click a head of the
first grid to see its metrics and attention map.</div>
<div id="metrics"></div>
<div class="row">
 <div class="panel"><h3 id="nameA"></h3><svg id="gridA"></svg><div id="legendA"></div></div>
 <div class="panel" id="boxB" style="display:none"><h3 id="nameB"></h3><svg id="gridB"></svg><div id="legendB"></div></div>
 <div class="panel" id="diffbox" style="display:none"><h3>difference (B - A)</h3><svg id="gridD"></svg>
  <div id="legendD"></div></div>
 <div class="panel"><svg id="depth" width="380" height="170"></svg></div>
</div>
<div class="row">
 <div class="panel"><h2 id="detail-title">Click a head in the grid</h2><table id="detail-metrics"></table></div>
 <div class="panel"><h3>Attention map <select id="probe"></select></h3><svg id="map" width="10" height="10"></svg></div>
</div>
<div class="panel"><h3>Rollout (blue) and attention flow (orange) into the last position (Abnar &amp; Zuidema)</h3>
 <svg id="flow" width="10" height="200"></svg></div>
<pre id="selftest"></pre>
<script type="application/json" id="atlas-data">{data}</script>
{cmp}
<script type="application/json" id="role-colors">{embed_json(ROLE_COLORS)}</script>
<script>{JS}</script>
</body></html>
"""


def write_pngs(atlas: HeadAtlas, out_dir: Path, compare: HeadAtlas | None = None) -> list[Path]:
    """Matplotlib PNGs of the grids (one per metric), roles, depth profile, basin profile, comparison."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    paths = []
    figsize = (max(4, atlas.num_heads * 0.45 + 2), max(3, atlas.num_layers * 0.22 + 1.5))
    for name in atlas.metrics:
        m = atlas.metric(name).numpy()
        fig, ax = plt.subplots(figsize=figsize)
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{atlas.model}: {name}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out_dir / f"grid_{name}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    idx = np.array([[ROLES.index(r) for r in row] for row in atlas.roles])
    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(idx, aspect="auto", cmap=ListedColormap([ROLE_COLORS[r] for r in ROLES]), vmin=-0.5,
              vmax=len(ROLES) - 0.5)
    ax.set_title(f"{atlas.model}: roles")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLORS[r]) for r in ROLES]
    ax.legend(handles, ROLES, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roles.png", dpi=90)
    plt.close(fig)
    paths.append(out_dir / "roles.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("sink", "entropy_norm", "locality", "induction", "retrieval", "lookback"):
        if name in atlas.metrics:
            axes[0].plot(np.nanmean(atlas.metric(name).numpy(), axis=1), label=name)
    axes[0].set_xlabel("layer")
    axes[0].set_title("mean over heads by depth")
    axes[0].legend(fontsize=7)
    if atlas.layer_metrics.get("max_abs"):
        axes[1].semilogy(atlas.layer_metrics["max_abs"], label="max |h|")
        axes[1].semilogy(atlas.layer_metrics["median_abs"], label="median |h|")
        axes[1].set_title("massive activations (hidden states)")
        axes[1].set_xlabel("layer")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "depth.png", dpi=90)
    plt.close(fig)
    paths.append(out_dir / "depth.png")
    if atlas.profile is not None:
        prof = np.array(atlas.profile)  # (L, H, bins)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        layers = prof.mean(1)
        for i in range(0, atlas.num_layers, max(1, atlas.num_layers // 6)):
            ax.plot(layers[i], label=f"layer {i}")
        ax.plot(layers.mean(0), "k--", lw=2, label="all layers")
        ax.set_xlabel("position bin of the context")
        ax.set_ylabel("share of context attention")
        ax.set_title("positional profile (attention basin)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "basin.png", dpi=90)
        plt.close(fig)
        paths.append(out_dir / "basin.png")
    if compare is not None:
        names = [n for n in atlas.metrics if n in compare.metrics]
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 3.5))
        xa = [float(np.nanmean(atlas.metric(n).numpy())) for n in names]
        xb = [float(np.nanmean(compare.metric(n).numpy())) for n in names]
        pos = np.arange(len(names))
        ax.bar(pos - 0.2, xa, 0.4, label=atlas.model)
        ax.bar(pos + 0.2, xb, 0.4, label=compare.model)
        ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title("mean over heads")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "compare.png", dpi=90)
        plt.close(fig)
        paths.append(out_dir / "compare.png")
    return paths


def write_report(atlas: HeadAtlas, out_dir: str | Path, compare: HeadAtlas | None = None,
                 pngs: bool = True) -> dict[str, Path]:
    """Write atlas.json, atlas.csv, report.html (and PNGs) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atlas.save(out / "atlas.json"), "csv": atlas.to_csv(out / "atlas.csv")}
    html = out / "report.html"
    html.write_text(render_html(atlas, compare), encoding="utf-8")
    paths["html"] = html
    if pngs:
        for p in write_pngs(atlas, out, compare):
            paths[p.stem] = p
    return paths
